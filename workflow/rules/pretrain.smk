# Stage 5: a BERT-style student from scratch with its objective (pipeline/pretrain/).


rule pretrain_student:
    input:
        unpack(rule_inputs("pretrain_student")),
    output:
        **rule_outputs("pretrain_student"),
    log:
        # The training log as CSV and TensorBoard events: they grow while training, so not outputs.
        **rule_logs("pretrain_student"),
    benchmark:
        rule_benchmark("pretrain_student")
    retries: RETRIES
    threads: rule_threads("pretrain_student")
    resources:
        attempt=job_attempt,
        mem_mb=8000,
        runtime=attempt_runtime(720),
        gpu=lambda w: GPU * W.student_options(w.student)["gpus"],
        checkpoint_seconds=CHECKPOINT_SECONDS,
    params:
        **rule_params("pretrain_student"),
    shell:
        command("pretrain_student")
