# Stage 2: a teacher's hidden states of one layer for a sample of tokens -> zarr (pipeline/teacher.py).


SAMPLE = {
    "sample_tokens": CONFIG["activations"]["sample_tokens"],
    "sample_seed": CONFIG["activations"]["seed"],
}


rule extract_activations:
    input:
        shards=corpus_shards(),
        manifest=path(contract.CORPUS_MANIFEST),
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
        " --out {output.store:q} --out-manifest {output.manifest:q} --resume-dir {params.resume:q}"
        " --params {params.stage:q} > {log:q} 2>&1"
