# Stage 2: a teacher's hidden states of one layer for a sample of tokens -> zarr (pipeline/teacher.py);
# for an auxiliary teacher, first its pre-training from scratch with MLM (pipeline/pretrain/).


rule pretrain_teacher:
    input:
        unpack(rule_inputs("pretrain_teacher")),
    output:
        **rule_outputs("pretrain_teacher"),
    log:
        **rule_logs("pretrain_teacher"),
    benchmark:
        rule_benchmark("pretrain_teacher")
    retries: RETRIES
    threads: rule_threads("pretrain_teacher")
    resources:
        attempt=job_attempt,
        mem_mb=8000,
        runtime=attempt_runtime(720),
        gpu=lambda w: GPU * CONFIG["teachers"][w.teacher]["auxiliary"]["gpus"],
        checkpoint_seconds=CHECKPOINT_SECONDS,
    params:
        **rule_params("pretrain_teacher"),
    shell:
        command("pretrain_teacher")


rule extract_activations:
    input:
        unpack(rule_inputs("extract_activations")),
    output:
        **rule_outputs("extract_activations"),
    log:
        **rule_logs("extract_activations"),
    benchmark:
        rule_benchmark("extract_activations")
    retries: RETRIES
    threads: rule_threads("extract_activations")
    resources:
        attempt=job_attempt,
        mem_mb=8000,
        runtime=attempt_runtime(120),
        gpu=GPU,
        checkpoint_seconds=CHECKPOINT_SECONDS,
    params:
        **rule_params("extract_activations"),
    shell:
        command("extract_activations")
