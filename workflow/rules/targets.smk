# Stage 4: per-token target distributions, one parquet shard per corpus shard (pipeline/targets.py).
TARGET_SLICE = {**CONFIG["targets"], "lambda": CONFIG["dictionary"]["lambda"]}


rule precompute_targets:
    input:
        unpack(lambda w: teacher_model_inputs(w.teacher)),
        shard=path(contract.CORPUS_SHARD),
        manifest=path(contract.CORPUS_MANIFEST),
        dictionary=path(contract.DICTIONARY),
        dictionary_metrics=path(contract.DICTIONARY_METRICS),
    output:
        shard=path(contract.TARGET_SHARD),
    params:
        stage=lambda w: teacher_params(w.teacher, "targets", TARGET_SLICE),
        resume=lambda w: resume_dir("precompute_targets", w.teacher, w.shard),
    log:
        log_path("precompute_targets", "{teacher}", "{shard}"),
    benchmark:
        bench_path("precompute_targets", "{teacher}", "{shard}")
    threads: 1
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=GPU,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.targets --corpus-shard {input.shard:q} --corpus-manifest {input.manifest:q}"
        " --dictionary {input.dictionary:q} --dictionary-metrics {input.dictionary_metrics:q}"
        " --out {output.shard:q} --resume-dir {params.resume:q} --params {params.stage:q} > {log:q} 2>&1"


# The validation split, coded the same way (for the students' validation MLSM loss).
use rule precompute_targets as precompute_validation_targets with:
    input:
        unpack(lambda w: teacher_model_inputs(w.teacher)),
        shard=path(contract.CORPUS_VALIDATION),
        manifest=path(contract.CORPUS_MANIFEST),
        dictionary=path(contract.DICTIONARY),
        dictionary_metrics=path(contract.DICTIONARY_METRICS),
    output:
        shard=path(contract.TARGET_VALIDATION),
    params:
        stage=lambda w: teacher_params(w.teacher, "targets", TARGET_SLICE),
        resume=lambda w: resume_dir("precompute_targets", w.teacher, "validation"),
    log:
        log_path("precompute_targets", "{teacher}", "validation"),
    benchmark:
        bench_path("precompute_targets", "{teacher}", "validation")


rule summarize_targets:
    input:
        shards=lambda w: target_shards(w.teacher),
        validation=path(contract.TARGET_VALIDATION),
    output:
        manifest=path(contract.TARGET_MANIFEST),
    params:
        stage=stage_params("targets", TARGET_SLICE),
    log:
        log_path("summarize_targets", "{teacher}"),
    benchmark:
        bench_path("summarize_targets", "{teacher}")
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.targets --summarize {input.shards:q} --validation {input.validation:q}"
        " --manifest {output.manifest:q}"
        " --params {params.stage:q} > {log:q} 2>&1"
