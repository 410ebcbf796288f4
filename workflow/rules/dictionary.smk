# Stage 3: non-negative sparse dictionary learning on the sampled states (pipeline/dictionary.py).


rule fit_dictionary:
    input:
        store=path(contract.ACTIVATIONS),
        store_manifest=path(contract.ACTIVATIONS_MANIFEST),
    output:
        dictionary=path(contract.DICTIONARY),
        metrics=path(contract.DICTIONARY_METRICS),
        atoms=path(contract.DICTIONARY_ATOMS),
    params:
        stage=stage_params("dictionary", CONFIG["dictionary"], device=CONFIG["device"]),
        resume=lambda w: resume_dir("fit_dictionary", w.teacher),
    log:
        log_path("fit_dictionary", "{teacher}"),
    benchmark:
        bench_path("fit_dictionary", "{teacher}")
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=GPU,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.dictionary --activations {input.store:q} --activations-manifest {input.store_manifest:q}"
        " --dictionary {output.dictionary:q} --metrics {output.metrics:q} --atoms {output.atoms:q}"
        " --resume-dir {params.resume:q} --params {params.stage:q} > {log:q} 2>&1"
