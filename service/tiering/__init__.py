"""Tiering: objects move from the hot tier to colder ones as they age, recompressed harder
(per instance or as series volumes), verified bit-exact; fixity re-reads what is kept.
APScheduler runs the jobs inside `compacs serve`; `compacs tier run` runs them once."""
