"""Applications on top of the library: the README demo (:mod:`.demo`) and the web viewer (:mod:`.viewer`)."""
