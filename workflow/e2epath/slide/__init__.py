"""Reading slides: the only OpenSlide user (`reader`) and direct JPEG tile decoding (`tiles`)."""
