"""Knowledge distillation: vocab-parallel KD losses and the teacher/student pairing."""
