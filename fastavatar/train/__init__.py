"""Training loops (decoder, W encoder, tracker) and what they share (:mod:`fastavatar.train.common`)."""
