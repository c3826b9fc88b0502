// Package fileperm applies Unix permission bits to the client's files and
// directories on every platform: as modes on Unix, and on Windows, where modes
// mean only "read-only or not", as an access control list. A file or directory
// whose mode grants nothing to group and others is private: on Windows its ACL
// then grants access only to the current user, SYSTEM and the Administrators
// group (the ACL Windows gives a user's profile, and what OpenSSH for Windows
// accepts for private keys), and inherits nothing from its parent.
package fileperm
