"""dept_experiment: reproduce DEPT's claims on one machine (STD against GLOB, TRIM, SPEC, SPEC-OPT)."""
