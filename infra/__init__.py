"""What a run needs besides the method: processes and wrapping (parallel), Hugging Face checkpoint I/O
(hf_io), a run's checkpoints and resume (checkpoint), atomic writes (atomic), the tokenized-data cache
(tokcache), the memory plan (memplan), interrupts (interrupt), metric loggers (loggers) and the command-line
convention (flags). Nothing here imports train.py or the objectives."""
