"""The `mailqueue` command and the embedded stack it runs for development (`mailqueue dev`):
a process supervisor, the Temporal dev server and a local SMTP catcher. Outside the domain
package: it starts the worker and the API, which the domain never imports."""
