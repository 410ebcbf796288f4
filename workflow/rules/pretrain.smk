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
        targets=lambda w, input: (
            f"--target-shards {' '.join(input.targets)}" if "targets" in input.keys() else ""
        ),
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
        "{params.launcher} -m pipeline.pretrain --corpus-shards {input.shards:q} {params.targets}"
        " --corpus-manifest {input.manifest:q} --out-model {output.model:q} --summary {output.summary:q}"
        " --params {params.stage:q} > {log:q} 2>&1"
