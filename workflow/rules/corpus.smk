# Stage 1: raw text -> tokenized sentence-pair sequences in parquet shards (pipeline/corpus.py).


rule shard_corpus:
    input:
        text=corpus_inputs(),
    output:
        shards=corpus_shards(),
        manifest=path(contract.CORPUS_MANIFEST),
    params:
        stage=stage_params("corpus", CONFIG["corpus"]),
    log:
        log_path("shard_corpus"),
    benchmark:
        bench_path("shard_corpus")
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.corpus --inputs {input.text:q} --shards {output.shards:q}"
        " --manifest {output.manifest:q} --params {params.stage:q} > {log:q} 2>&1"
