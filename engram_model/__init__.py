"""The Engram module (DeepSeek, *Conditional Memory via Scalable Lookup*) and a small Engram LM."""
