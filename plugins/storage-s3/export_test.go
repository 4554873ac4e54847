package s3store

// SetCopyMultipart lowers the size above which Copy copies in parts and
// the part size it then uses, so that tests copy in parts without 5 GiB
// objects. Call it before the driver is used.
func SetCopyMultipart(d *Driver, threshold, part int64) {
	d.copyThreshold, d.copyPart = threshold, part
}

// PartSizeFor is the part size a Put of size bytes uses when
// part_size_bytes is partSize.
func PartSizeFor(partSize, size int64) (int64, error) {
	return (&settings{partSize: partSize}).partSizeFor(size)
}
