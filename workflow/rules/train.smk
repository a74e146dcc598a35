

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
        "{PY} -m wsi_asmil.split --labels {input.labels:q} --inventory {input.inventory:q}"
        " --out {output:q} {params.args} > {log:q} 2>&1"


# The per-model sections of train (asmil:, abmil:, ...): the only mappings in it, as the schema says.
MODEL_KEYS = tuple(k for k, v in config["train"].items() if isinstance(v, dict))


def train_params(wildcards):
    """The train section as wsi_asmil.train expects it (only this model's settings, so editing
    another model's hyper-parameters does not retrain this one)."""
    skip = ("models", "device", "threads", *MODEL_KEYS)
    params = {k: v for k, v in config["train"].items() if k not in skip}
    params["models"] = {wildcards.model: config["train"][wildcards.model]}
    return json.dumps(params, sort_keys=True)


rule train:
    input:
        features=lambda wc: feature_markers(usable(TRAIN_IDS)),
        split=SPLIT,
    output:
        model=f"{MODEL_DIR}/model.pt",
        last=f"{MODEL_DIR}/last.pt",
        history=f"{MODEL_DIR}/history.csv",
        predictions=f"{MODEL_DIR}/predictions.csv",
        metrics=f"{MODEL_DIR}/metrics.json",
        curves=f"{MODEL_DIR}/curves.png",
    params:
        features_dir=FEATURES_DIR,
        out_dir=lambda wc: f"{OUT}/models/{wc.model}/fold{wc.fold}",
        train=train_params,
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
        "OMP_NUM_THREADS={threads} {PY} -m wsi_asmil.train --features-dir {params.features_dir:q}"
        " --split {input.split:q} --fold {wildcards.fold} --model {wildcards.model}"
        " --params {params.train:q} --device {params.device:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"
