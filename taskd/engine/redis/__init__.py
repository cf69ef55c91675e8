"""The shared task space on Redis: ``space`` (connection, script, codec), ``engine``
(the actor's engine over it), ``script.lua`` (the server-side commands)."""
