"""The data between the stages: its contract (paths, schemas, format versions), the readers and writers of
its files, atomic writes and the records that prove them intact, one writer per output, and the inputs the
stages read (corpus text, Hugging Face datasets, task files) and how text is packed into sequences."""
