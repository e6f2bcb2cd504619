# Encoder checkpoints recorded (path, sha256) once before any job uses them: torchvision's ImageNet
# weights, fetched into the torch cache (on the submit host, which is online where compute nodes are
# not), and files of the local Hugging Face cache (never downloaded).

localrules:
    encoder_weights,


rule encoder_weights:
    output:
        out=layout.WEIGHTS_RECORD,
    params:
        step="encoder_weights",
        encoder="{encoder}",
        arch=encoder_arch,
        weights=record_weights,
    log:
        layout.log("encoder_weights/{source}/{encoder}"),
    benchmark:
        layout.benchmark("encoder_weights/{source}/{encoder}")
    conda:
        "../../envs/train.yaml"
    resources:
        mem_mb=per_attempt(2000),
        runtime=30,
    script:
        "../scripts/step.py"
