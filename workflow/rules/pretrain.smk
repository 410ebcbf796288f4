# Stage 5: a BERT-style student from scratch with its objective (pipeline/pretrain.py).


rule pretrain_student:
    input:
        unpack(student_inputs),
    output:
        model=directory(path(contract.STUDENT_MODEL)),
        summary=path(contract.STUDENT_SUMMARY),
    params:
        stage=lambda w: student_params(w.student),
        launcher=lambda w: torchrun_command(student_gpus(w.student)),
        resume=lambda w: resume_dir("pretrain_student", w.student),
    log:
        log_path("pretrain_student", "{student}"),
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
        " --corpus-manifest {input.manifest:q} --out-model {output.model:q} --summary {output.summary:q}"
        " --resume-dir {params.resume:q} --params {params.stage:q} > {log:q} 2>&1"
