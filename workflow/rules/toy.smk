# The embedded toy suite: a byte-level BPE tokenizer and GPT-NeoX (or, suite architecture gpt2,
# GPT-2) runs trained on CPU, saved per checkpoint in the hub's layout
# (results/<suite>/hub/<run>/step<N>/, or checkpoint-<N>/ for gpt2).

TOY = config["toy"]  # validated: `training` is there whenever a toy suite is selected


rule toy_tokenizer:
    conda:
        "../envs/mechgen.yaml"
    # Seconds of work: a cluster job would cost a whole polling round.
    localrule: True
    output:
        f"{RES}/tokenizer/tokenizer.json",
    params:
        vocab_size=TOY["vocab_size"],
    log:
        f"{RES}/logs/toy_tokenizer.log",
    script:
        "../../scripts/toy_tokenizer.py"


rule toy_train:
    conda:
        "../envs/mechgen.yaml"
    input:
        tokenizer=f"{RES}/tokenizer/tokenizer.json",
    output:
        manifest=f"{RES}/hub/{{run}}/manifest.json",
    params:
        size_spec=lambda wc: TOY["sizes"][RUNS[wc.run].base_size],
        seed=lambda wc: RUNS[wc.run].seed,
        data_seed=lambda wc: RUNS[wc.run].data_seed,
        weight_seed=lambda wc: RUNS[wc.run].weight_seed,
        training=lambda wc: toy_training(config),
        schedule=STEPS,
        vocab_size=TOY["vocab_size"],
        # Only when not GPT-NeoX: a new param is a rerun trigger, and GPT-NeoX runs trained
        # before families existed must not be retrained for it.
        **({"architecture": SPEC["architecture"]} if SPEC["architecture"] != "gpt_neox" else {}),
    threads: lambda wc: TOY["training"]["threads"]
    # Training is the long pole of the default run: start every run's training before scoring
    # the checkpoints of runs already trained, so the last training does not end alone.
    priority: 10
    resources:
        mem_mb=2000,
        runtime=60,
    log:
        f"{RES}/logs/toy_train/{{run}}.log",
    script:
        "../../scripts/toy_train.py"
