# Stage 1: raw text -> tokenized, packed sequences in parquet shards and a validation split
# (pipeline/corpus.py); optionally first a tokenizer trained on that text (pipeline/tokenizer.py).


rule train_tokenizer:
    input:
        text=corpus_inputs(),
    output:
        model=directory(path(contract.TOKENIZER)),
        manifest=path(contract.TOKENIZER_MANIFEST),
    params:
        stage=tokenizer_params(),
    log:
        log_path("train_tokenizer"),
    benchmark:
        bench_path("train_tokenizer")
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.tokenizer --inputs {input.text:q} --out {output.model:q}"
        " --manifest {output.manifest:q} --params {params.stage:q} > {log:q} 2>&1"


rule shard_corpus:
    input:
        text=corpus_inputs(),
        tokenizer_manifest=[path(contract.TOKENIZER_MANIFEST)] if TRAINED_TOKENIZER else [],
    output:
        shards=corpus_shards(),
        validation=path(contract.CORPUS_VALIDATION),
        token_counts=path(contract.CORPUS_TOKEN_COUNTS),
        manifest=path(contract.CORPUS_MANIFEST),
    params:
        stage=corpus_params(),
        tokenizer_manifest=(
            ["--tokenizer-manifest", path(contract.TOKENIZER_MANIFEST)] if TRAINED_TOKENIZER else []
        ),
    log:
        log_path("shard_corpus"),
    benchmark:
        bench_path("shard_corpus")
    threads: CONFIG["corpus"]["threads"]
    resources:
        mem_mb=lambda w, threads: 2000 + 2000 * threads,
        runtime=240,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.corpus --inputs {input.text:q} --shards {output.shards:q}"
        " --validation {output.validation:q} --token-counts {output.token_counts:q}"
        " --manifest {output.manifest:q} --workers {threads:q} {params.tokenizer_manifest:q}"
        " --params {params.stage:q} > {log:q} 2>&1"
