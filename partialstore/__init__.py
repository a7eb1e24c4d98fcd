"""partialstore: transactional partial saving of JAX PyTree checkpoints to any store."""
