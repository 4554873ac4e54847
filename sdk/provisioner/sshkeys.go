package provisioner

import (
	"bytes"
	"fmt"
	"regexp"
	"slices"
	"strings"

	"golang.org/x/crypto/ssh"
)

// AuthorizedKeyTypes are the SSH key types CanonicalSSHKey accepts for a
// tenant: Ed25519, ECDSA, RSA (at least 2048 bits) and their security-key
// forms.
func AuthorizedKeyTypes() []string {
	return []string{
		ssh.KeyAlgoED25519, ssh.KeyAlgoECDSA256, ssh.KeyAlgoECDSA384, ssh.KeyAlgoECDSA521, ssh.KeyAlgoRSA,
		ssh.KeyAlgoSKED25519, ssh.KeyAlgoSKECDSA256,
	}
}

// sshKeyCommentRE is what a key's comment may hold: it ends up in files on
// the node (authorized_keys, cloud-init user data).
var sshKeyCommentRE = regexp.MustCompile(`^[A-Za-z0-9@._+=:/, -]{0,128}$`)

// CanonicalSSHKey checks one authorized_keys line of a ProvisionRequest
// and returns it as "<type> <base64> [comment]", ready to be written on the
// node. Options (command=..., from=...), further lines, control characters,
// other key types and short RSA keys are refused: a driver writes nothing
// a tenant could use to run more than a login shell.
func CanonicalSSHKey(line string) (string, error) {
	line = strings.TrimSpace(line)
	if line == "" || len(line) > 16<<10 {
		return "", fmt.Errorf("empty or longer than 16 KiB")
	}
	if strings.ContainsFunc(line, func(r rune) bool { return r < ' ' || r == 0x7f }) {
		return "", fmt.Errorf("contains control characters")
	}
	pub, comment, options, rest, err := ssh.ParseAuthorizedKey([]byte(line))
	if err != nil {
		return "", fmt.Errorf("not an OpenSSH public key: %v", err)
	}
	if len(options) > 0 || len(bytes.TrimSpace(rest)) > 0 {
		return "", fmt.Errorf("key options and extra lines are not allowed")
	}
	if !slices.Contains(AuthorizedKeyTypes(), pub.Type()) {
		return "", fmt.Errorf("key type %s is not allowed", pub.Type())
	}
	if ck, ok := pub.(ssh.CryptoPublicKey); ok && pub.Type() == ssh.KeyAlgoRSA {
		type sizer interface{ Size() int }
		if k, ok := ck.CryptoPublicKey().(sizer); ok && k.Size()*8 < 2048 {
			return "", fmt.Errorf("RSA key of %d bits; at least 2048 required", k.Size()*8)
		}
	}
	if !sshKeyCommentRE.MatchString(comment) {
		return "", fmt.Errorf("comment has characters outside [A-Za-z0-9@._+=:/, -]")
	}
	out := strings.TrimSpace(string(ssh.MarshalAuthorizedKey(pub)))
	if comment != "" {
		out += " " + comment
	}
	return out, nil
}
