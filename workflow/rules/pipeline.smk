# Every rule of the pipeline, made from its declaration (pipeline/wiring/<stage>.py: what it reads and
# writes, its jobs, config slice, threads, resources and cost), in the order the stages run. What each
# rule reads and writes is in the table below (kept up to date by tests/test_dataflow.py) and as a graph in
# the README ("The rule graph"); `snakemake --dry-run --printshellcmds` prints every job's command.
#
# DATAFLOW


for _rule in RULES.values():
    if not _rule.enabled(CONFIG):
        continue
    # Snakemake evaluates `shell:` again when the job runs, where `rule` is the job's rule name (the loop's
    # variable would be the last rule's by then); the global `rule` gives the same name here.
    globals()["rule"] = _rule.name

    rule:
        name:
            _rule.name
        input:
            unpack(rule_inputs(_rule.name)),
        output:
            **rule_outputs(_rule.name),
        log:
            **rule_logs(_rule.name),
        benchmark:
            rule_benchmark(_rule.name)
        retries: RETRIES if _rule.resumable else 0
        localrule: _rule.resources.local
        threads: rule_threads(_rule.name)
        resources:
            **rule_resources(_rule.name),
        params:
            **rule_params(_rule.name),
        shell:
            command(rule)
