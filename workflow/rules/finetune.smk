# Stage 6: every student x task x seed fine-tuned on the task's train split, scored on dev (pipeline/finetune.py).


rule finetune:
    input:
        unpack(task_files),
        model=path(contract.STUDENT_MODEL),
        summary=path(contract.STUDENT_SUMMARY),
    output:
        scores=path(contract.FINETUNE_SCORES),
    params:
        stage=lambda w: finetune_params(w.student, w.task, w.seed),
        resume=lambda w: resume_dir("finetune", w.student, w.task, f"seed{w.seed}"),
    log:
        log_path("finetune", "{student}", "{task}", "seed{seed}"),
    benchmark:
        bench_path("finetune", "{student}", "{task}", "seed{seed}")
    threads: 1
    resources:
        mem_mb=6000,
        runtime=240,
        gpu=GPU,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.finetune --model {input.model:q} --student-summary {input.summary:q}"
        " --out {output.scores:q} --resume-dir {params.resume:q} --params {params.stage:q} > {log:q} 2>&1"
