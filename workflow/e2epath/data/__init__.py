"""From stores to model inputs: bags and multi-scale sampling (`bags`, `sampling`), threaded JPEG
decoding (`decoding`), patches to tensors (`transforms`), patient-level splits (`splits`)."""
