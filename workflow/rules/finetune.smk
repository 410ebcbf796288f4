# Stage 6: every student x task x seed fine-tuned on the task's train split, scored on dev (pipeline/finetune.py);
# for the finetune.checkpoint_tasks, the students' intermediate checkpoints too (sample efficiency).


rule finetune:
    input:
        unpack(rule_inputs("finetune")),
    output:
        **rule_outputs("finetune"),
    log:
        **rule_logs("finetune"),
    benchmark:
        rule_benchmark("finetune")
    retries: RETRIES
    threads: rule_threads("finetune")
    resources:
        attempt=job_attempt,
        mem_mb=6000,
        runtime=attempt_runtime(240),
        gpu=GPU,
        checkpoint_seconds=CHECKPOINT_SECONDS,
    params:
        **rule_params("finetune"),
    shell:
        command("finetune")
