# Stage 3: non-negative sparse dictionary learning on the sampled states (pipeline/dictionary.py).


rule fit_dictionary:
    input:
        unpack(rule_inputs("fit_dictionary")),
    output:
        **rule_outputs("fit_dictionary"),
    log:
        **rule_logs("fit_dictionary"),
    benchmark:
        rule_benchmark("fit_dictionary")
    retries: RETRIES
    threads: rule_threads("fit_dictionary")
    resources:
        attempt=job_attempt,
        mem_mb=8000,
        runtime=attempt_runtime(120),
        gpu=GPU,
        checkpoint_seconds=CHECKPOINT_SECONDS,
    params:
        **rule_params("fit_dictionary"),
    shell:
        command("fit_dictionary")
