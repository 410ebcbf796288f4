# Stage 3: non-negative sparse dictionary learning on the sampled states (pipeline/dictionary.py).


rule fit_dictionary:
    input:
        store=path(contract.ACTIVATIONS),
    output:
        dictionary=path(contract.DICTIONARY),
        metrics=path(contract.DICTIONARY_METRICS),
        atoms=path(contract.DICTIONARY_ATOMS),
    params:
        stage=stage_params("dictionary", CONFIG["dictionary"], device=CONFIG["device"]),
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
        "python -m pipeline.dictionary --activations {input.store:q} --dictionary {output.dictionary:q}"
        " --metrics {output.metrics:q} --atoms {output.atoms:q} --params {params.stage:q} > {log:q} 2>&1"
