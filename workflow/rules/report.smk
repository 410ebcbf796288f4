# Stage 7: tables, plots, dictionary metrics and atom browser comparing the students (pipeline/report.py).


localrules:
    report,


rule report:
    input:
        unpack(rule_inputs("report")),
    output:
        **rule_outputs("report"),
    log:
        **rule_logs("report"),
    benchmark:
        rule_benchmark("report")
    threads: rule_threads("report")
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        **rule_params("report"),
    shell:
        command("report")
