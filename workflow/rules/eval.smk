# The evaluation text: the sentences verbatim, as a JSON list (a sentence may hold a newline),
# then token ids per run (each run's own tokenizer, fetched once per run, not per checkpoint).

rule eval_sentences:
    conda:
        "../envs/mechgen.yaml"
    # Seconds of work and a download: run on the submitting host, not as a cluster job.
    localrule: True
    input:
        eval_corpus_input,
    output:
        sentences=f"{RES}/eval/sentences.json",
    params:
        eval=EVAL,
        naturalstories=config.get("naturalstories"),  # required (validated) for kind naturalstories
    log:
        f"{RES}/logs/eval_sentences.log",
    script:
        "../../scripts/eval_sentences.py"


rule eval_tokens:
    conda:
        "../envs/mechgen.yaml"
    # Seconds per run and a tokenizer download: run on the submitting host.
    localrule: True
    input:
        sentences=f"{RES}/eval/sentences.json",
        tokenizer=tokenizer_input,
    output:
        f"{RES}/eval/tokens/{{run}}.json",
    params:
        run=lambda wc: run_info(wc.run),
        tokenizer_revision=tokenizer_revision(),
        max_tokens=SCORING["max_tokens"],
    log:
        f"{RES}/logs/eval_tokens/{{run}}.log",
    script:
        "../../scripts/eval_tokens.py"
