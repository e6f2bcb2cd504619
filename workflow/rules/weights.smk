# Pretrained encoder weights: torchvision's ImageNet checkpoints, fetched once into the torch cache
# before any job trains (on the submit host, which is online where compute nodes are not).

localrules:
    imagenet_weights,


rule imagenet_weights:
    output:
        out=layout.IMAGENET_WEIGHTS,
    params:
        step="imagenet_weights",
        encoder="{encoder}",
    log:
        "results/logs/imagenet_weights/{encoder}.log",
    benchmark:
        "results/benchmarks/imagenet_weights/{encoder}.tsv"
    conda:
        "../../envs/train.yaml"
    resources:
        mem_mb=per_attempt(2000),
        runtime=30,
    script:
        "../scripts/step.py"
