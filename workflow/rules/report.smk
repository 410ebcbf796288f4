# Stage 7: tables, plot, dictionary metrics and atom browser comparing the students (pipeline/report.py).


rule report:
    input:
        scores=finetune_scores(),
        students=expand(path(contract.STUDENT_SUMMARY), student=STUDENTS),
        dictionaries=expand(path(contract.DICTIONARY_METRICS), teacher=TEACHERS),
        atoms=expand(path(contract.DICTIONARY_ATOMS), teacher=TEACHERS),
        targets=expand(path(contract.TARGET_MANIFEST), teacher=TEACHERS),
    output:
        md=path(contract.REPORT_MD),
        html=path(contract.REPORT_HTML),
        csv=path(contract.REPORT_CSV),
        png=path(contract.REPORT_PLOT),
        curve=path(contract.REPORT_CURVE),
        manifest=path(contract.REPORT_MANIFEST),
    params:
        stage=stage_params("report", device=CONFIG["device"], student_gpus={s: student_gpus(s) for s in STUDENTS}),
        benchmarks=f"{R}/{contract.BENCHMARKS}",
    log:
        log_path("report"),
    benchmark:
        bench_path("report")
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.report --scores {input.scores:q} --students {input.students:q}"
        " --dictionaries {input.dictionaries:q} --atoms {input.atoms:q} --targets {input.targets:q}"
        " --benchmarks {params.benchmarks:q} --out-md {output.md:q} --out-csv {output.csv:q}"
        " --out-png {output.png:q} --out-curve {output.curve:q} --out-html {output.html:q}"
        " --out-manifest {output.manifest:q}"
        " --params {params.stage:q} > {log:q} 2>&1"
