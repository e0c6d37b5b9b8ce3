"""Graph-based structured pruning of any model: capture the ops (`capture`), one rule per op family
(`rules`), channel groups that must shrink together (`groups`, `dependency`), importance (`importance`),
physical removal (`surgery`) and the whole plan-and-apply (`structured`)."""
