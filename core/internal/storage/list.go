package storage

import (
	"context"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
)

// Entry is one line of a listing: a file, or a folder (with its marker
// object when mkdir made one, without when only its contents imply it).
type Entry struct {
	Path   string
	Folder bool
	Object *Object
}

// ListRequest selects a page of a listing.
type ListRequest struct {
	// Prefix is the folder to list ("" is the root).
	Prefix string
	// After is the Path of the last entry of the previous page.
	After string
	// Recursive lists every object under Prefix instead of its entries.
	Recursive bool
	// Limit is the page size; List returns up to Limit+1 entries so the
	// caller knows whether another page follows.
	Limit int
}

// List lists a folder in path order (bytewise, as S3 does): its files and
// the folders directly in it, or with Recursive every object under it.
func (s *Service) List(ctx context.Context, p Project, req ListRequest) ([]Entry, error) {
	prefix, err := CleanPath(req.Prefix, Prefix)
	if err != nil {
		return nil, err
	}
	if req.After != "" && !strings.HasPrefix(req.After, prefix) {
		return nil, invalidKey("the cursor is not of this prefix")
	}
	// Every path under prefix lies in [prefix, upper): prefix ends in '/',
	// and '0' is the byte after '/'.
	var upper *string
	if prefix != "" {
		u := prefix[:len(prefix)-1] + "0"
		upper = &u
	}
	after, skipTo := prefix, ""
	if req.After != "" {
		after = req.After
		if strings.HasSuffix(after, "/") && !req.Recursive {
			skipTo = after[:len(after)-1] + "0" // past everything in that folder
		}
	}
	var rows pgx.Rows
	if req.Recursive {
		rows, err = s.pool.Query(ctx, `SELECT `+objectColumns+` FROM storage_objects
			WHERE project_id = $1 AND path > $2 AND ($3::text IS NULL OR path < $3)
			ORDER BY path LIMIT $4`, p.ID, after, upper, req.Limit+1)
	} else {
		// A loose index scan: one seek per entry. After an object inside a
		// subfolder the walk jumps past the whole subfolder.
		rows, err = s.pool.Query(ctx, `WITH RECURSIVE walk AS (
				(SELECT o.*, 1 AS n FROM storage_objects o
				 WHERE o.project_id = $1 AND o.path > $2 AND o.path >= $3 AND ($4::text IS NULL OR o.path < $4)
				 ORDER BY o.path LIMIT 1)
			  UNION ALL
				SELECT o.*, w.n + 1 FROM walk w, LATERAL (
					SELECT * FROM storage_objects o
					WHERE o.project_id = $1 AND o.path > w.path AND ($4::text IS NULL OR o.path < $4)
					  AND o.path >= CASE WHEN strpos(substr(w.path, char_length($5::text) + 1), '/') > 0
						THEN left(w.path, char_length($5::text) + strpos(substr(w.path, char_length($5::text) + 1), '/') - 1) || '0'
						ELSE '' END
					ORDER BY o.path LIMIT 1) o
				WHERE w.n < $6
			)
			SELECT `+objectColumns+` FROM walk`, p.ID, after, skipTo, upper, prefix, req.Limit+1)
	}
	if err != nil {
		return nil, fmt.Errorf("storage: list: %w", err)
	}
	defer rows.Close()
	var out []Entry
	for rows.Next() {
		o, err := scanObject(rows)
		if err != nil {
			return nil, fmt.Errorf("storage: list: %w", err)
		}
		if req.Recursive {
			out = append(out, Entry{Path: o.Path, Folder: o.Folder(), Object: o})
			continue
		}
		rest := o.Path[len(prefix):]
		switch i := strings.IndexByte(rest, '/'); {
		case i < 0:
			out = append(out, Entry{Path: o.Path, Object: o})
		case i == len(rest)-1:
			out = append(out, Entry{Path: o.Path, Folder: true, Object: o}) // the folder's marker
		default:
			out = append(out, Entry{Path: prefix + rest[:i+1], Folder: true})
		}
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("storage: list: %w", err)
	}
	return out, nil
}
