# Stage 4: per-token target distributions of each corpus part, a training shard or the validation split
# (pipeline/targets.py), and their statistics summed into one record (pipeline/target_summary.py).


rule precompute_targets:
    input:
        unpack(rule_inputs("precompute_targets")),
    output:
        **rule_outputs("precompute_targets"),
    log:
        **rule_logs("precompute_targets"),
    benchmark:
        rule_benchmark("precompute_targets")
    retries: RETRIES
    threads: rule_threads("precompute_targets")
    resources:
        attempt=job_attempt,
        mem_mb=8000,
        runtime=attempt_runtime(240),
        gpu=GPU,
        checkpoint_seconds=CHECKPOINT_SECONDS,
    params:
        **rule_params("precompute_targets"),
    shell:
        command("precompute_targets")


localrules:
    summarize_targets,


rule summarize_targets:
    input:
        unpack(rule_inputs("summarize_targets")),
    output:
        **rule_outputs("summarize_targets"),
    log:
        **rule_logs("summarize_targets"),
    benchmark:
        rule_benchmark("summarize_targets")
    threads: rule_threads("summarize_targets")
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        **rule_params("summarize_targets"),
    shell:
        command("summarize_targets")


localrules:
    summarize_phase_targets,


# The record of the targets of the corpus packed at another length (a seq_len_schedule phase).
rule summarize_phase_targets:
    input:
        unpack(rule_inputs("summarize_phase_targets")),
    output:
        **rule_outputs("summarize_phase_targets"),
    log:
        **rule_logs("summarize_phase_targets"),
    benchmark:
        rule_benchmark("summarize_phase_targets")
    threads: rule_threads("summarize_phase_targets")
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        **rule_params("summarize_phase_targets"),
    shell:
        command("summarize_phase_targets")
