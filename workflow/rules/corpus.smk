# Stage 1: raw text -> tokenized, packed sequences in parquet shards and a validation split
# (pipeline/corpus.py); optionally first a tokenizer trained on that text (pipeline/tokenizer.py).


rule train_tokenizer:
    input:
        unpack(rule_inputs("train_tokenizer")),
    output:
        **rule_outputs("train_tokenizer"),
    log:
        **rule_logs("train_tokenizer"),
    benchmark:
        rule_benchmark("train_tokenizer")
    threads: rule_threads("train_tokenizer")
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        **rule_params("train_tokenizer"),
    shell:
        command("train_tokenizer")


rule shard_corpus:
    input:
        unpack(rule_inputs("shard_corpus")),
    output:
        **rule_outputs("shard_corpus"),
    log:
        **rule_logs("shard_corpus"),
    benchmark:
        rule_benchmark("shard_corpus")
    threads: rule_threads("shard_corpus")
    resources:
        mem_mb=lambda w, threads: 2000 + 2000 * threads,
        runtime=240,
    params:
        **rule_params("shard_corpus"),
    shell:
        command("shard_corpus")


# The same text packed at another length, for a phase of a seq_len_schedule (pipeline/corpus.py).
rule shard_corpus_phase:
    input:
        unpack(rule_inputs("shard_corpus_phase")),
    output:
        **rule_outputs("shard_corpus_phase"),
    log:
        **rule_logs("shard_corpus_phase"),
    benchmark:
        rule_benchmark("shard_corpus_phase")
    threads: rule_threads("shard_corpus_phase")
    resources:
        mem_mb=lambda w, threads: 2000 + 2000 * threads,
        runtime=240,
    params:
        **rule_params("shard_corpus_phase"),
    shell:
        command("shard_corpus_phase")
