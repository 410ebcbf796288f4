# Every rule of the pipeline, made from its declaration (pipeline/wiring/<stage>.py: what it reads and
# writes, its jobs, config slice, threads, resources and cost), in the order the stages run. What each
# rule reads and writes is in the table below, by the rules that write its inputs in the embedded default
# and two variants ("given": the user's files; pipeline/wiring/dataflow.py; tests/test_dataflow.py keeps it
# up to date), and as a graph in the README ("The rule graph"). `snakemake --dry-run --printshellcmds`
# prints every job's command.
#
# bbc_news_data
#     reads:  -
#     writes: resources/bbc_news/pretrain.txt.gz, resources/bbc_news/topic/train.tsv,
#             resources/bbc_news/topic/dev.tsv, resources/bbc_news/manifest.json
# train_tokenizer
#     reads:  text (bbc_news_data)
#     writes: tokenizer/model, tokenizer/manifest.json
# shard_corpus
#     reads:  text (bbc_news_data), tokenizer_manifest (train_tokenizer)
#     writes: corpus/shard-{shard}.parquet, corpus/validation.parquet, corpus/token_counts.npy,
#             corpus/manifest.json
# shard_corpus_phase
#     reads:  text (bbc_news_data)
#     writes: corpus/len{length}/shard-{shard}.parquet, corpus/len{length}/validation.parquet,
#             corpus/len{length}/token_counts.npy, corpus/len{length}/manifest.json
# pretrain_teacher
#     reads:  corpus_shards (shard_corpus), corpus_manifest (shard_corpus)
#     writes: teachers/{teacher}/auxiliary/model, teachers/{teacher}/auxiliary/summary.json
# extract_activations
#     reads:  corpus_shards (shard_corpus), corpus_manifest (shard_corpus), token_counts (shard_corpus),
#             teacher_model (pretrain_teacher), teacher_summary (pretrain_teacher)
#     writes: teachers/{teacher}/activations.zarr, teachers/{teacher}/manifest.json
# fit_dictionary
#     reads:  activations (extract_activations), activations_manifest (extract_activations)
#     writes: dictionaries/{dictionary}/dictionary.npy, dictionaries/{dictionary}/metrics.json,
#             dictionaries/{dictionary}/atoms.json
# precompute_targets
#     reads:  corpus_part (shard_corpus/shard_corpus_phase), corpus_manifest
#             (shard_corpus/shard_corpus_phase), dictionary (fit_dictionary), dictionary_metrics
#             (fit_dictionary), teacher_model (pretrain_teacher), teacher_summary (pretrain_teacher)
#     writes: targets/{dictionary}/{part}.parquet, targets/{dictionary}/{part}.json
# summarize_targets
#     reads:  shards (precompute_targets), validation (precompute_targets), records (precompute_targets)
#     writes: targets/{dictionary}/manifest.json
# summarize_phase_targets
#     reads:  shards (precompute_targets), records (precompute_targets)
#     writes: targets/{dictionary}/len{length}/manifest.json
# pretrain_student
#     reads:  corpus_shards (shard_corpus), corpus_manifest (shard_corpus), validation (shard_corpus),
#             token_counts (shard_corpus), target_shards (precompute_targets), target_manifest
#             (summarize_targets), validation_targets (precompute_targets), dictionary_metrics
#             (fit_dictionary), teacher_model (pretrain_teacher), teacher_summary (pretrain_teacher),
#             phase_shards (shard_corpus_phase), phase_manifests (shard_corpus_phase), phase_target_shards
#             (precompute_targets), phase_target_manifests (summarize_phase_targets)
#     writes: students/{student}/model, students/{student}/checkpoints, students/{student}/summary.json
# finetune
#     reads:  train (bbc_news_data), dev (bbc_news_data), model (pretrain_student), model_summary
#             (pretrain_student)
#     writes: finetune/{student}/{snapshot}/{task}/seed{seed}.json
# report
#     reads:  scores (finetune), students (pretrain_student), dictionaries (fit_dictionary), atoms
#             (fit_dictionary), targets (summarize_targets), benchmarks (bbc_news_data/extract_activations/fin
#             etune/fit_dictionary/precompute_targets/pretrain_student/pretrain_teacher/shard_corpus/shard_cor
#             pus_phase/summarize_phase_targets/summarize_targets/train_tokenizer), task_files (bbc_news_data)
#     writes: report/report.md, report/report.html, report/results.csv, report/scores.png,
#             report/sample_efficiency.png, report/cards, report/ablation, report/manifest.json


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
        group:
            rule_group(_rule.name)
        localrule: _rule.resources.local
        threads: rule_threads(_rule.name)
        resources:
            **rule_resources(_rule.name),
        params:
            **rule_params(_rule.name),
        shell:
            command(rule, W)
