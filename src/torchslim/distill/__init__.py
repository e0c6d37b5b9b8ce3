"""Knowledge distillation: losses, hooks by module path, the distiller, students, the `distill` stage."""
