"""Knowledge distillation: losses, hooks by module path, the one loss (`distiller`: a task's output
term plus feature terms), students, the per-task setups (`logits`, `encoder`, `lm`) and the one
`distill` stage (`stage`)."""
