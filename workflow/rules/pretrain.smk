# Stage 5: a BERT-style student from scratch with its objective (pipeline/pretrain.py).


rule pretrain_student:
    input:
        unpack(student_inputs),
    output:
        model=directory(path(contract.STUDENT_MODEL)),
        checkpoints=directory(path(contract.STUDENT_CHECKPOINTS)),
        summary=path(contract.STUDENT_SUMMARY),
    params:
        stage=lambda w: student_params(w.student),
        launcher=lambda w: torchrun_command(student_gpus(w.student)),
        resume=lambda w: resume_dir("pretrain_student", w.student),
        validation_targets=optional_input("validation_targets"),
        dictionary=optional_input("dictionary"),
        dictionary_metrics=optional_input("dictionary_metrics"),
    log:
        main=log_path("pretrain_student", "{student}"),
        # The training log as CSV and TensorBoard events: they grow while training, so not outputs.
        metrics=f"{R}/{contract.LOGS}/pretrain_student/{{student}}.csv",
        tensorboard=directory(f"{R}/{contract.LOGS}/pretrain_student/{{student}}.tensorboard"),
    benchmark:
        bench_path("pretrain_student", "{student}")
    threads: lambda w: student_gpus(w.student)
    resources:
        mem_mb=8000,
        runtime=720,
        gpu=lambda w: GPU * student_gpus(w.student),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "{params.launcher} -m pipeline.pretrain --corpus-shards {input.shards:q} --target-shards {input.targets:q}"
        " --validation-targets {params.validation_targets:q} --dictionary {params.dictionary:q}"
        " --dictionary-metrics {params.dictionary_metrics:q}"
        " --corpus-manifest {input.manifest:q} --validation {input.validation:q} --out-model {output.model:q}"
        " --out-checkpoints {output.checkpoints:q} --summary {output.summary:q} --metrics-csv {log.metrics:q}"
        " --tensorboard-dir {log.tensorboard:q} --resume-dir {params.resume:q} --params {params.stage:q}"
        " > {log.main:q} 2>&1"
