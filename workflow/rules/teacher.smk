# Stage 2: a teacher's hidden states of one layer for a sample of tokens -> zarr (pipeline/teacher.py);
# for an auxiliary teacher, first its pre-training from scratch with MLM (pipeline/pretrain.py).


SAMPLE = {
    "sample_tokens": CONFIG["activations"]["sample_tokens"],
    "sample_seed": CONFIG["activations"]["seed"],
    "subsample": CONFIG["activations"]["subsample"],
    "subsample_threshold": CONFIG["activations"]["subsample_threshold"],
    "positions_per_sequence": CONFIG["activations"]["positions_per_sequence"],
}


rule pretrain_teacher:
    input:
        shards=corpus_shards(),
        manifest=path(contract.CORPUS_MANIFEST),
    output:
        model=directory(path(contract.AUXILIARY_TEACHER)),
        summary=path(contract.AUXILIARY_SUMMARY),
    params:
        stage=lambda w: auxiliary_params(w.teacher),
        launcher=lambda w: torchrun_command(CONFIG["teachers"][w.teacher]["auxiliary"]["gpus"]),
        resume=lambda w: resume_dir("pretrain_teacher", w.teacher),
    log:
        log_path("pretrain_teacher", "{teacher}"),
    benchmark:
        bench_path("pretrain_teacher", "{teacher}")
    threads: lambda w: CONFIG["teachers"][w.teacher]["auxiliary"]["gpus"]
    resources:
        mem_mb=8000,
        runtime=720,
        gpu=lambda w: GPU * CONFIG["teachers"][w.teacher]["auxiliary"]["gpus"],
    conda:
        "../envs/pipeline.yaml"
    shell:
        "{params.launcher} -m pipeline.pretrain --corpus-shards {input.shards:q} --corpus-manifest {input.manifest:q}"
        " --out-model {output.model:q} --summary {output.summary:q} --resume-dir {params.resume:q}"
        " --params {params.stage:q} > {log:q} 2>&1"


rule extract_activations:
    input:
        unpack(lambda w: teacher_model_inputs(w.teacher)),
        shards=corpus_shards(),
        manifest=path(contract.CORPUS_MANIFEST),
        token_counts=path(contract.CORPUS_TOKEN_COUNTS),
    output:
        store=directory(path(contract.ACTIVATIONS)),
        manifest=path(contract.ACTIVATIONS_MANIFEST),
    params:
        stage=lambda w: teacher_params(w.teacher, "activations", SAMPLE),
        resume=lambda w: resume_dir("extract_activations", w.teacher),
    log:
        log_path("extract_activations", "{teacher}"),
    benchmark:
        bench_path("extract_activations", "{teacher}")
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=GPU,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.teacher --corpus-manifest {input.manifest:q} --corpus-shards {input.shards:q}"
        " --token-counts {input.token_counts:q} --out {output.store:q} --out-manifest {output.manifest:q}"
        " --resume-dir {params.resume:q} --params {params.stage:q} > {log:q} 2>&1"
