# The evaluation text: one sentence per line, then token ids per run (each run's own tokenizer,
# fetched once per run, not once per checkpoint).

EVAL = SPEC.get("eval", {"kind": "naturalstories"})


def eval_corpus_input(wildcards):
    # A user's corpus file is an input, so editing it rescores everything downstream.
    return [EVAL["path"]] if EVAL["kind"] == "file" else []


rule eval_sentences:
    input:
        eval_corpus_input,
    output:
        sentences=f"{RES}/eval/sentences.txt",
        meta=f"{RES}/eval/sentences.json",
    params:
        eval=EVAL,
        naturalstories=config.get("naturalstories", {}),
    log:
        f"{RES}/logs/eval_sentences.log",
    script:
        "../../scripts/eval_sentences.py"


def tokenizer_input(wildcards):
    # The toy suite's tokenizer is built by the pipeline; other sources fetch their own.
    return [f"{RES}/tokenizer/tokenizer.json"] if SOURCE == "toy" else []


rule eval_tokens:
    input:
        sentences=f"{RES}/eval/sentences.txt",
        tokenizer=tokenizer_input,
    output:
        f"{RES}/eval/tokens/{{run}}.json",
    params:
        run=lambda wc: run_info(wc.run),
        tokenizer_revision=SPEC.get("tokenizer_revision", f"step{STEPS[-1]}" if STEPS else "main"),
        max_tokens=SCORING.get("max_tokens", 512),
    log:
        f"{RES}/logs/eval_tokens/{{run}}.log",
    script:
        "../../scripts/eval_tokens.py"
