# Stage 6: every student x task x seed fine-tuned on the task's train split, scored on dev (pipeline/finetune.py);
# for the finetune.checkpoint_tasks, the students' intermediate checkpoints too (sample efficiency).


rule finetune:
    input:
        unpack(task_files),
        unpack(finetune_model),
    output:
        scores=path(contract.FINETUNE_SCORES),
    params:
        stage=lambda w: finetune_params(w.student, w.task, w.seed, w.snapshot),
        model=finetune_model_dir,
        resume=lambda w: resume_dir("finetune", w.student, w.snapshot, w.task, f"seed{w.seed}"),
    log:
        log_path("finetune", "{student}", "{snapshot}", "{task}", "seed{seed}"),
    benchmark:
        bench_path("finetune", "{student}", "{snapshot}", "{task}", "seed{seed}")
    threads: 1
    resources:
        mem_mb=6000,
        runtime=240,
        gpu=GPU,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.finetune --model {params.model:q} --student-summary {input.summary:q}"
        " --out {output.scores:q} --resume-dir {params.resume:q} --params {params.stage:q} > {log:q} 2>&1"
