"""The SPE console: server-rendered pages for hospital admins, access bodies and researchers,
and the public permit register (see ``spe.web.views`` for the contract, ``docs/console.md``)."""
