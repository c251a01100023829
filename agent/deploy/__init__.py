"""Putting Pinion on a cluster: `pinion install` (install.py) renders the manifests of deploy/.

`manifests` is a symlink to the repository's deploy/ directory, the one copy of the manifests:
`kubectl apply -f deploy/` reads them there, and setuptools packages them as data of this
package (the wheel gets the files themselves), so an installed `pinion` finds them too.
Nothing here is imported by the agent: PyYAML is a dependency of the CLI path only.
"""
