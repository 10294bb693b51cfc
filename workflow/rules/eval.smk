# The evaluation text: the sentences verbatim, as a JSON list (a sentence may hold a newline),
# then token ids per tokenizer (common.smk, eval_tokens_key): one file for a toy suite, whose
# runs share the tokenizer the pipeline trains; per run otherwise (each run's own tokenizer,
# fetched once per run, not per checkpoint).

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
    # Seconds per tokenizer and a tokenizer download: run on the submitting host.
    localrule: True
    input:
        sentences=f"{RES}/eval/sentences.json",
        tokenizer=tokenizer_input,
    output:
        f"{RES}/eval/tokens/{{tokens}}.json",
    params:
        # The run whose tokenizer to fetch; none for a toy suite's one file (its tokenizer is
        # the input).
        run=lambda wc: None if wc.tokens == TOY_SUITE_TOKENS else run_info(wc.tokens),
        tokenizer_revision=tokenizer_revision(),
        max_tokens=SCORING["max_tokens"],
    log:
        f"{RES}/logs/eval_tokens/{{tokens}}.log",
    script:
        "../../scripts/eval_tokens.py"
