

rule split:
    input:
        labels=LABELS,
        inventory=INVENTORY,
    output:
        SPLIT,
    params:
        args=lambda wc: cli_args("split"),
        version=VERSION,
    conda:
        ENV
    log:
        f"{OUT}/logs/split.log",
    benchmark:
        f"{OUT}/benchmarks/split.tsv"
    shell:
        "{PY} -m wsi_asmil.mil.split --labels {input.labels:q} --inventory {input.inventory:q}"
        " --out {output:q} {params.args} > {log:q} 2>&1"


def train_params_json(wildcards):
    """The train section for this job's model only (wsi_asmil.pipeline.workflow_args.train_params)."""
    return train_params(config["train"], wildcards.model)


rule train:
    input:
        features=lambda wc: feature_markers(usable(TRAIN_IDS)),
        split=SPLIT,
    output:
        model=f"{MODEL_DIR}/model.pt",
        **({"last": f"{MODEL_DIR}/last.pt"} if config["train"]["keep_last"] else {}),
        history=f"{MODEL_DIR}/history.csv",
        predictions=f"{MODEL_DIR}/predictions.csv",
        metrics=f"{MODEL_DIR}/metrics.json",
        curves=f"{MODEL_DIR}/curves.png",
    params:
        features_dir=FEATURES_DIR,
        out_dir=lambda wc: LAYOUT.fold(wc.model, wc.fold),
        train=train_params_json,
        device=config["train"]["device"],
        version=VERSION,
    threads: config["train"]["threads"]
    resources:
        gpu=gpus("train"),
    conda:
        ENV
    log:
        f"{OUT}/logs/train/{{model}}/fold{{fold}}.log",
    benchmark:
        f"{OUT}/benchmarks/train/{{model}}/fold{{fold}}.tsv"
    shell:
        "OMP_NUM_THREADS={threads} {PY} -m wsi_asmil.mil.train --features-dir {params.features_dir:q}"
        " --split {input.split:q} --fold {wildcards.fold} --model {wildcards.model}"
        " --params {params.train:q} --device {params.device:q} --out-dir {params.out_dir:q}"
        " --memory-budget {config[train][memory_budget]:q} > {log:q} 2>&1"
