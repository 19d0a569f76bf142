"""Audio: speech (``/v1/audio/speech``), transcription (``/v1/audio/transcriptions``) and the voice pipeline
(``/v1/ws/voice``). Models come from the config's ``audio_models`` (docs/audio.md)."""
