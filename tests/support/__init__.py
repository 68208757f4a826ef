"""Shared test support: the real MLflow server, HTTP receivers, the headless browser, the
models (planted-bug torch models, the classic net, the Hugging Face zoo) and the scripts
tests run in subprocesses."""
